"""Storage: where bytes live and how they are written and read.

    atomic.py    all-or-nothing writes of files and folders
    cache.py     this machine's content cache (files by SHA-256, an index of immutable sources)
    sources.py   where a dataset comes from: a folder, an S3 prefix, a DVC-tracked path of a git repository
    images.py    image files decoded the way every step sees them
"""
