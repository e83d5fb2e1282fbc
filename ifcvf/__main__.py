from ifcvf.cli import main

raise SystemExit(main())
