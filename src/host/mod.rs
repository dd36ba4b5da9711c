//! The host model: facts about this machine that doctor judges and setup changes.
//! (Being built: see the doctor issue.)
