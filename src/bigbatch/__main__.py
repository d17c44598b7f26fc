from bigbatch.cli import main
from bigbatch.launch import exit_process

exit_process(main())
