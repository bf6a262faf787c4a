"""Input pipeline (Section 2.1): sources, the paper's augmentation, and `make_dataset`.

`augment` holds the pure ops and the evaluation transform that exports reuse, `sources` the dataset
strings (`tfds:`, `tfrecord:`, `folder:`, `synthetic`), `pipeline` the tf.data assembly.
"""

from bot_keras.data.augment import decode_image, preprocess_for_eval, preprocess_for_train
from bot_keras.data.pipeline import make_dataset, per_replica_batch_size
from bot_keras.data.sources import DatasetInfo, dataset_info
from bot_keras.run_dir import read_class_names, write_class_names  # classes.txt lives in run_dir

__all__ = [
    "DatasetInfo",
    "dataset_info",
    "decode_image",
    "make_dataset",
    "per_replica_batch_size",
    "preprocess_for_eval",
    "preprocess_for_train",
    "read_class_names",
    "write_class_names",
]
