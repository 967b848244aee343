"""Scaling model: predicted step time and scaling efficiency of DDP SGD and distributed SENG.

Per-step time = compute + exposed communication. Communication is an alpha-beta model of
allreduce (ring or tree; hierarchical: NVLink inside a node, InfiniBand across nodes) applied
to the collectives that ``CountingCommunicator`` (SENG) and a DDP communication hook (SGD)
count on the real model on 2 Gloo ranks here: bytes, calls and rounds are measured, not typed
in. Overlap: a bucket can start when the backward of its layers is done (backward progress from
the FLOPs ``torch.utils.flop_counter`` counts per layer), one bucket after another on the link;
what runs past the end of backward is exposed. Compute: ResNet50 from the paper's V100 timings
(Table 3, Table 5); ByteLM from its FLOPs at the V100 rate those timings imply, and SENG's
overhead measured on this CPU. Validation: (a) α, β fitted to this machine's Gloo loopback at 2
ranks predict 3 ranks (and back); (b) the paper's Table 3 (4 → 8/16/32 V100s). Formulas,
figures and assumptions: ``docs/scaling.md``.

Modules: ``model`` (the analytic model and the public figures), ``calibrate`` (its inputs,
measured here or fitted to the paper), ``validate`` (checks against timings it did not see),
``tables`` (results.md and the plot), ``__main__`` (the command line).
"""
