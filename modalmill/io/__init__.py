"""The on-disk format and storage: local and s3:// I/O, input readers, tar writers, crops, decoding, manifests."""
