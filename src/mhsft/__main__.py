from mhsft.cli import main

raise SystemExit(main())
