from fedus.cli import main

main()
