from bigbatch.cli import main
from bigbatch.parallel.launch import exit_process

exit_process(main())
