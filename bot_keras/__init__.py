"""bot_keras: Bag of Tricks for Image Classification with CNNs (He et al., 2018) in Keras 3.

Layout, one concern a module:
  models/      ResNet A/B/C/D builders (Section 4), zero-gamma (Section 3.1), backbones
  data/        tf.data input: sources, the paper's augmentation (Section 2.1), mixup (Section 5.4)
  schedules    linear scaling, warmup (Section 3.1) and cosine decay (Section 5.1)
  optimizers   Nesterov SGD, weight decay with no bias/BN decay (Section 3.1)
  losses       label smoothing (Section 5.2), knowledge distillation (Section 5.3)
  steps / loop the distributed train and eval steps; the host loop, callbacks and checkpoints
  teacher      the distillation teacher (Section 5.3)
  run_dir      the run directory: flags.txt, classes.txt, run.json, model.keras
  model_files  loading models: a run's in float32, a .keras file, a classification run's backbone
  atomic_write writes that leave the previous file whole (a temporary, fsync, os.replace)
  cli          exit codes, SetupError and the entry-point wrapper every command uses
  train / evaluate / export / predict   the command-line entry points
"""

from bot_keras import console

console.quiet_tensorflow_start_up()  # before anything imports TensorFlow (see console.py)

__version__ = "0.1.0"
