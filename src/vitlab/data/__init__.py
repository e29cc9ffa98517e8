"""Data: official sources and md5s, download and verification, safe extraction and parsing, augmentation."""
