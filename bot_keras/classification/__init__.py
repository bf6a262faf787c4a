"""Image classification, the paper's task: `task.py` implements `bot_keras.tasks.Task` for it."""
