"""python -m synthetic --out DIR --videos N --seed S [--grounding M] [--broken] ..."""

from synthetic.cli import main

if __name__ == "__main__":
    main()
