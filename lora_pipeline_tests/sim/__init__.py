"""A deterministic simulation of the whole pipeline, as FoundationDB and TigerBeetle test themselves.

One seed decides everything: which actors run (submitters, RunPod workers, webhook
deliveries, sensor ticks, reconciliations with housekeeping and the version retention,
alias moves, deletes, outside tools dropping files), how their store and RunPod calls
interleave, when each one crashes, stalls or loses an answer, and how far each actor's
clock is skewed. The real domain code runs single-threaded against an in-memory store
(``store.SimStore``) and an in-memory RunPod (``runpod.SimRunPod``) on simulated time
(``scheduler.Sim``); then the world drains and ``invariants.check`` states what must
hold. A failing schedule is replayed from its seed:
``python -m lora_pipeline_tests.sim --seed N``.
"""
