"""``inferlane bench``: measure the fraud lane against two yardsticks on the same broker and model.

The lane (``faust -A agents worker``) is compared, one at a time on the same local stack, with
two *yardsticks* that exist only to put its numbers in context (they are not features):

* :mod:`pipeline.bench.naive_faust` - a faust agent as a typical user writes it;
* :mod:`pipeline.bench.bare_loop` - a bare aiokafka consume/score/produce/commit loop.

:mod:`pipeline.bench.runner` drives the scenarios (open-loop steady rates and a backlog drain),
:mod:`pipeline.bench.reader` reads results in a separate process, :mod:`pipeline.bench.stats`
turns raw timings into numbers and :mod:`pipeline.bench.report` writes the results folder.
"""
