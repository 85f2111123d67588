"""The "Attention" tab for TensorBoard.

TensorBoard finds it through the `tensorboard_plugins` entry point
(`attnlog.tensorboard_plugin.plugin:AttentionPlugin`). Nothing here is imported by `import attnlog`,
so attnlog itself never imports tensorboard.
"""
