from achilles_guard.cli import main

raise SystemExit(main())
