"""Per-pair neural fields against convolutional GradICON and ICON on the same held-out pairs.

    python demos/benchmark_vs_icon.py                          # 2D hollow shapes (dataset a)
    python demos/benchmark_vs_icon.py --dataset bodies3d       # 3D labelled bodies (dataset b)
    python demos/benchmark_vs_icon.py --pairs 4 --train-minutes 1 --out out/quick

The same as ``nfreg benchmark``; the options and what is measured are described in
``neuralfield_reg/app/benchmark_vs_icon.py`` (``--help``).
"""

from neuralfield_reg.app.benchmark_vs_icon import main

if __name__ == "__main__":
    main()
