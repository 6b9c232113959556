"""Microbenchmarks (installed as ``mtlfast.bench``): the harness and one ``bench_<op>.py`` per op.
Run them with ``mtlfast bench [OP ...]``; committed results live in bench/results/<device>/."""
