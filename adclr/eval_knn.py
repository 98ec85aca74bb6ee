"""``python -m adclr.eval_knn``: DINO's weighted k-NN (``adclr.evaluation.knn``, which documents it)."""

from .evaluation.knn import main

if __name__ == "__main__":
    main()
