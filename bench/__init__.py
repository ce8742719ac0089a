"""Benchmarks of eenet: kernel microbenchmarks (:mod:`bench.micro`), end-to-end early exit
against the execution modes users run today (:mod:`bench.e2e`, peers in :mod:`bench.peers`),
all timed by one runner (:mod:`bench.runner`). Results go to ``bench/results/<device>/``."""
