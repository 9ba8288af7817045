"""Pure logic: no torch model, no I/O, no spaCy pipeline. Alignment of word pieces to words and tokens,
windows, tag schemes and their decoding, answer search, metric arithmetic and shared constants; every
function takes and returns plain data (lists, NumPy arrays), so it is tested with property tests."""
