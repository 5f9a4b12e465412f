"""One image, start to end: claim, decode, preprocess, classify, store, archive."""
