"""Input pipeline (Section 2.1): sources, the paper's augmentation, and `make_dataset`.

`sources` turns dataset strings (`tfds:`, `tfrecord:`, `folder:`, `synthetic`) into encoded examples, with
the image-folder listing in `folder` and the built-in textures in `synthetic`; `decode` sniffs, checks and
decodes encoded bytes; `augment` holds the Section 2.1 ops (switched by `Augmentation`) and the evaluation
transform that exports reuse; `pipeline` assembles them into `make_dataset`.
"""

from bot_keras.data.augment import Augmentation, preprocess_for_eval, preprocess_for_train
from bot_keras.data.decode import check_encoded_image, decode_image
from bot_keras.data.errors import bad_input_message
from bot_keras.data.folder import list_folder
from bot_keras.data.pipeline import SkippedFiles, make_dataset, per_replica_batch_size
from bot_keras.data.sources import DatasetInfo, dataset_info
from bot_keras.run_dir import read_class_names, write_class_names  # classes.txt lives in run_dir

__all__ = [
    "Augmentation",
    "DatasetInfo",
    "SkippedFiles",
    "check_encoded_image",
    "dataset_info",
    "decode_image",
    "bad_input_message",
    "list_folder",
    "make_dataset",
    "per_replica_batch_size",
    "preprocess_for_eval",
    "preprocess_for_train",
    "read_class_names",
    "write_class_names",
]
