"""Tokenizers: train them on labeled shards, then write the token shards 4M's trainer reads.

Adding a modality to a 4M-style dataset is: label it, train a tokenizer on the labels, tokenize.

- :mod:`.quantizers`  VQ (cosine, EMA, dead codes), FSQ and Memcodes behind one interface
- :mod:`.models`      the ViT VQ-VAE (image-like inputs, feature maps, SAM instance masks) and the MLP tokenizer
- :mod:`.adapters`    per source modality: crop/flip/resize, model input, loss, metrics (shared by training and
  token writing)
- :mod:`.checkpoint`  safetensors + JSON checkpoints and resumable training state (never pickles)
- :mod:`.data`        streaming training crops from an output root, held-out split by key
- :mod:`.train`       presets, the training loop, Ray Train's TorchTrainer, evaluation report + picture
- :mod:`.labelers`    tokenizers as derived stateful labelers (``tok_rgb``, ``tok_canny_edge``, ...), registered
  through the ``modalmill.labelers`` entry point (``modalmill tokenize`` itself is
  :mod:`modalmill.jobs.tokenize_output`)
- :mod:`.text_tokenizer`  4M's WordPiece text tokenizer and the serialisers of structured labels

Heavy dependencies (torch, Ray) are imported by the submodules that need them, not here.
"""
