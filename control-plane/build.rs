// `sqlx::migrate!` embeds the migration files at compile time; without this, adding a
// migration would not rebuild the crate (stable Rust cannot track the folder otherwise).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
