from asyncrunner.cli import main

raise SystemExit(main())
