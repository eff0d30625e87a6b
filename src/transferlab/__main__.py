from transferlab.cli import main

if __name__ == "__main__":  # DDP ranks start by spawn, which imports this module again
    main()
