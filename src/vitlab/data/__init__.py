"""Data: official sources and md5s, download and verification, safe extraction and parsing, augmentation."""

IMAGE_SIZE = 32  # height and width of every prepared image (CIFAR's size), and of every model's input
