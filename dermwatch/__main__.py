from dermwatch.cli import main

main()
