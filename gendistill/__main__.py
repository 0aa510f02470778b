from gendistill.cli import main

raise SystemExit(main())
