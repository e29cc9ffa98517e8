"""vitlab: Vision Transformers on CIFAR, from download to ONNX Runtime.

The library knows nothing about DVC or the repository layout: functions take arrays, tensors, dataclasses and
paths. ``pipeline/`` and the ``vitlab`` CLI are thin callers of the same functions. Importing it changes
nothing process-wide: the entry points set up the CPU libraries themselves (vitlab.cpu).
"""

__version__ = "0.1.0"
