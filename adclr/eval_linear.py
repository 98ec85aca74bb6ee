"""``python -m adclr.eval_linear``: DINO's linear probe (``adclr.evaluation.linear``, which documents it)."""

from .evaluation.linear import main

if __name__ == "__main__":
    main()
