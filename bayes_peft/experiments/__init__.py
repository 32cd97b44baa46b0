"""The run layer above the library: :mod:`.training` (the loop and its checkpoints), :mod:`.runs` (train and
fit stages with cached checkpoints), :mod:`.methods` (the registry of the seeds' methods), :mod:`.compare`
(every method on one run, scored by one evaluator), :mod:`.benchmarking` (what the benchmark scripts share),
:mod:`.evidence_study` and :mod:`.demo`."""
