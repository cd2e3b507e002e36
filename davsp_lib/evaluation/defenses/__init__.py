"""The baseline defenses with their own recipe: AdaShield-A, UniGuard, ESIII, PAT.

Each is a row of :data:`davsp_lib.evaluation.generation.DEFENSES`; AdaShield-A, ESIII and PAT
rebuild theirs from an artifact with ``defense_fields``, UniGuard's noise loads as a
:class:`~davsp_lib.method.vsp.VisualSafetyPrompt`.
"""
