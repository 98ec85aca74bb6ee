"""``python -m adclr.eval_seg``: the linear segmentation probe (``adclr.evaluation.seg``, which documents it)."""

from .evaluation.seg import main

if __name__ == "__main__":
    main()
