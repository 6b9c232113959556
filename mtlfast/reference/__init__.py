"""Literal pure-PyTorch definitions of the ops, following the papers' formulas (DESIGN.md §3).

They are the ``reference`` backend and the ground truth of every kernel test; kernels may use exact
reformulations, references do not."""
