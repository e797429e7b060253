"""python -m tagmoe_dist.dispatch: build the native CPU expert kernel now and say which kernel runs."""

from tagmoe_dist.kernels.native import main

raise SystemExit(main())
