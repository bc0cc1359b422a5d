"""Benchmarks: sessionscope against a hand-written ``Depends(get_db)`` and published peers.

Run everything with ``make bench`` (``bash benchmarks/run.sh``); ``python -m benchmarks --help``
lists the parts that can be run one at a time. Results go to ``benchmarks/RESULTS.md``.
"""
