"""Batch inference: ``agrivlm infer`` (stacks → chips → batched generation → fields and growth stages on the map).

In-process: :func:`agrivlm.infer.batch.run_inference` (the command as a function),
:class:`agrivlm.infer.generate.Predictor` (a loaded checkpoint answering questions in batches),
:class:`agrivlm.infer.prepare.ChipPreparer` (a chip → its questions), :func:`agrivlm.infer.runner.ask_chip` (one
question about one chip, as the explorer asks), :func:`agrivlm.infer.nms.nms`,
:class:`agrivlm.infer.journal.Journal`, :func:`agrivlm.pipeline.inputs.save_input_config` (for trainers).
Importing this package loads nothing heavy.
"""
