try:
    from transferlab.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports us: a line, not a traceback (cli.main guards the rest)
    print("\ntransferlab: interrupted", flush=True)
    raise SystemExit(130) from None

if __name__ == "__main__":  # DDP ranks start by spawn, which imports this module again
    main()
