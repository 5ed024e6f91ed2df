"""The pipeline: readers, decoding, crops, labelling shards on Ray, writers, manifests and resume."""
