fn main() {
    eprintln!("aiw-agent: not yet implemented");
    std::process::exit(2);
}
