from pedetect.cli import main

main()
