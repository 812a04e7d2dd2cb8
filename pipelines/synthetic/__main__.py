"""python -m pipelines.synthetic --out DIR --videos N --seed S [--grounding M] [--broken] ..."""

from pipelines.synthetic.cli import main

if __name__ == "__main__":
    main()
