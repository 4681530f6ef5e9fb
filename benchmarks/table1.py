"""Table 1 of the paper in miniature; the code is rela/bench/table1.py (also ``rela bench table1``).

    .venv/bin/python benchmarks/table1.py --help
"""

from rela.bench.table1 import main

if __name__ == "__main__":
    main()
