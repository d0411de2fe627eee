import sys

from ai_inference.main import main

sys.exit(main())
