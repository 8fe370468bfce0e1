from vta_sam.cli import main

raise SystemExit(main())
