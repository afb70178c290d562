def main():
    print("occrt")
