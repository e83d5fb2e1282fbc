from ifcvf.tools.cli import main

raise SystemExit(main())
