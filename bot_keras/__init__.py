"""bot_keras: Bag of Tricks for Image Classification with CNNs (He et al., 2018) in Keras 3.

Layout, one concern a module:
  models/      ResNet A/B/C/D builders (Section 4), zero-gamma (Section 3.1), backbones
  data/        tf.data input: sources, the paper's augmentation (Section 2.1), mixup (Section 5.4)
  schedules    linear scaling, warmup (Section 3.1) and cosine decay (Section 5.1)
  optimizers   Nesterov SGD, weight decay with no bias/BN decay (Section 3.1)
  losses       label smoothing (Section 5.2), knowledge distillation (Section 5.3)
  train / evaluate / export / predict   the command-line entry points
"""

__version__ = "0.1.0"
