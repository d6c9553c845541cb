"""Reference solutions of the exercises: tests/test_exercises.py checks them, so each exercise is
known to be solvable. Write yours first (exercises/exN_*.py); ``python -m exercises --solutions``
runs the same checks on these."""
