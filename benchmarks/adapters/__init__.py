"""One small evaluation adapter per method file: `adapters.<method>.load(ckpt_path, device)`.

benchmarks/ imports the method files, never the reverse. Each adapter builds, on the method file's
own plain `load(ckpt, device)` and its edit / reconstruct / generate functions, a namespace that
benchmarks/evaluate.py scores:

  attr_names  attribute names, in the column order of every attribute tensor below
  img_size    int or (H, W); crop: the centre crop in official pixels (None = full frame)
  edit(images, attr_src, attr_tgt) -> images          or None
  reconstruct(images) -> images                       or None
  generate(attrs, seed) -> images                     or None
  encode(images) -> {factor name: (B, D) code}        or None
  conditional  (optional, default True) False when generate ignores attrs (mad's prior)

Images are float in [-1, 1], (B, 3, H, W); attributes are 0/1 floats (B, A); results come back on
the CPU.
"""
