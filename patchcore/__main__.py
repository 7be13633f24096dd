from .errors import main

main()
