"""LoRA fine-tune recipes for MemFlow (see README.md in this folder).

* ``streaming_long_tuning``: Self-Forcing rollouts with the memory active and prompt switches,
  trained by DMD against a bidirectional teacher and a learned critic;
* ``memory_finetune``: teacher-forced flow matching on real long videos with clean past chunks in
  the memory (data from ``build_dataset``).

Run one with ``python -m recipes.<name> --config FILE [section.key=value ...]``,
``accelerate launch -m recipes.<name> ...`` or ``torchrun -m ...``.
"""
